"""dare-serve load testing with locust."""
