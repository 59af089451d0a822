"""The DICOM data dictionary (pydicom's), without importing pydicom.

``import pydicom`` costs 0.3-0.5 s of CPU on these machines (its package imports its readers,
writers, pixel handlers and numpy), and every Airflow task start parses the DAG file, whose
flows name DICOM keywords, and most tasks read or walk DICOM headers without any other need for
pydicom. The dictionary itself is one data module of plain literals, ``pydicom/_dicom_dict.py``:
loaded by file it costs ~5 ms. Where pydicom is already imported, or that file is not where
this pydicom keeps it, the public ``pydicom.datadict`` is used: the same tables.
(tests/dicom/test_dictionary.py checks they are pydicom's.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_DATA_MODULE = "pydicom._dicom_dict"


def _load() -> Any:
    if _DATA_MODULE in sys.modules:
        return sys.modules[_DATA_MODULE]
    spec = importlib.util.find_spec("pydicom")  # finds the package; runs none of it
    if spec is not None and spec.origin:
        path = Path(spec.origin).with_name("_dicom_dict.py")
        if path.is_file():
            file_spec = importlib.util.spec_from_file_location("raddeploy_provider.dicom._pydicom_dict", path)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                if isinstance(getattr(module, "DicomDictionary", None), dict):
                    return module
    from pydicom import datadict  # another layout: the public module, at its import cost
    return datadict


_tables = _load()

#: tag (int) -> (VR, VM, name, retired, keyword), as ``pydicom.datadict.DicomDictionary``.
DicomDictionary: dict[int, tuple[str, str, str, str, str]] = _tables.DicomDictionary
#: keyword -> tag, as ``pydicom.datadict.keyword_dict``.
keyword_dict: dict[str, int] = {entry[4]: tag for tag, entry in DicomDictionary.items()}
