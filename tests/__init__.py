"""The test suite, laid out like the package: nlmeans/, nn/, cli/, data/, exercises/; shared helpers in helpers.py."""
