"""Side-by-side benchmark suites behind `mor-lab bench`."""
