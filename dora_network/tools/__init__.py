"""Console tools around DoRA files: inspect, merge, convert, analyze. Each has a library function the tests call.

Commands (each module's ``main``): ``inspect`` (dora-inspect), ``convert`` (dora-convert), ``merge_checkpoint``
(dora-merge), ``analyze`` (dora-analyze). What they share:

* ``cli``: root logging, parsers, progress bars, precision names.
* ``base_model``: ``--model`` loading ("tiny", diffusers folder, checkpoint) and its layers by ``lora_name``.
* ``checkpoint_layout``: SAI single-file / diffusers keys -> layer names, fused CLIP-G in_proj row slices.
* ``safetensors_stream``: tensor-by-tensor safetensors reads and rewrites, without mmap.
* ``loader_rules``: per-loader verdict rules (reference/loaders.md) for dora-inspect.
* ``file_modules``: a state dict module by module (specs, s·B·A, W', the file's DoRA axis).
* ``conversion``, ``exact``, ``refit``: the conversion result and meter, exact conversions, SVD re-fits.
"""
