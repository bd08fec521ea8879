# The benchmarks import the installed eotfast (pytest runs with --import-mode=importlib).
