"""The real helm binary of the chart tests, and the operator process of the controller tests."""

from tests.controllers.conftest import cluster, start_operator  # noqa: F401
from tests.helm.conftest import helm  # noqa: F401
