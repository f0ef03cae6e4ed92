"""lora_monitor's tests, laid out like the package.

- ``functional/``, ``adapters/``, ``analysis/``, ``outputs/``, ``engine/``, ``integrations/``:
  a test module per package module with logic (``test_svd.py`` tests ``functional/svd.py``);
- ``test_cli.py``, ``test_layers.py``: ``lora_monitor.cli`` and the package's import graph;
- ``test_package.py``: the package root (lazy names, what importing it loads);
- ``end_to_end/``: what spans the layers (the architecture matrix, the first screen, a real
  TensorBoard server, the MiniLM study, the docstring examples);
- ``helpers/``: tiny models, event reading, Lightning and transformers set-ups, dense references.

Every directory is a package, so that test modules of the same name in two directories
(``adapters/test_variants.py``, ``analysis/test_variants.py``) import as
``tests.adapters.test_variants`` and ``tests.analysis.test_variants``; the helpers import as
``tests.helpers.<module>`` wherever the repository's root is on ``sys.path`` (pytest puts it
there; a subprocess is given it).
"""
