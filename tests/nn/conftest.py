"""The nn tests use the suite's ``xp`` fixture (tests/conftest.py): numpy and the strict CuPy
double always, and cupy where a GPU is usable."""
