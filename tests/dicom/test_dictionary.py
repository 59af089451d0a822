"""raddeploy_provider.dicom.dictionary is pydicom's data dictionary, read without importing pydicom."""

from __future__ import annotations

import subprocess
import sys

from pydicom import datadict

from raddeploy_provider.dicom import dictionary


def test_the_tables_are_pydicoms():
    assert dictionary.DicomDictionary == datadict.DicomDictionary
    assert dictionary.keyword_dict == datadict.keyword_dict


def test_loading_it_imports_no_pydicom():
    done = subprocess.run([sys.executable, "-c", (
        "import sys; from raddeploy_provider.dicom.dictionary import keyword_dict, DicomDictionary; "
        "assert keyword_dict['PatientID'] == 0x00100020 and DicomDictionary[0x00100020][0] == 'LO'; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydicom'))")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
