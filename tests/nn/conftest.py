"""The `slow` marker: tests that take more than a few seconds on CI's two cores
(an Inductor compile); `-m "not slow"` leaves them out."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds on two cores (an Inductor compile)")
