"""Console tools around DoRA files: inspect, merge, convert, analyze. Each has a library function the tests call."""
