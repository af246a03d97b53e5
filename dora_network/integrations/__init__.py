"""Code that meets another program: the diffusers pipeline helper and the ComfyUI node's logic.

Each module imports its program only inside the functions that need it, so ``import dora_network`` stays
torch + safetensors only.
"""
