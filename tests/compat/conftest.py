"""The real helm binary of the chart tests, for the guide's chart commands."""

from tests.helm.conftest import helm  # noqa: F401
