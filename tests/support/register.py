"""Register tests/support as the package ``xipa_test_support`` (idempotent). Conftests run this file with
``runpy.run_path`` because the package cannot be imported before it is registered."""
import importlib.util
import sys
from pathlib import Path

NAME = "xipa_test_support"
if NAME not in sys.modules:
    _here = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location(NAME, _here / "__init__.py", submodule_search_locations=[str(_here)])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[NAME] = _module
    _spec.loader.exec_module(_module)
