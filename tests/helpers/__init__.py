"""Code shared by tests: real local servers, image files, recipes, datasets, models and outputs (not tests).

Imported as ``from tests.helpers.servers import S3Server``; test modules never import each other or ``conftest``.
"""
