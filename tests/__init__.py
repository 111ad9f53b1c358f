"""The test suite, by layer (unit, model, data, training, integration, flows, infra); shared code in `helpers`."""

import pytest

# helpers hold asserts (dataset and output checks): rewrite them so failures show the compared values
pytest.register_assert_rewrite("tests.helpers")
