"""raddeploy-provider: run a clinic's AI models on the DICOM it pushes, through Airflow.

Layers (docs/architecture.md): the pure core (``config``, ``units``, ``flows``, ``store``,
``completion``, ``gpu``, ``airflow_client``, ``dicom``) imports no Airflow; the Airflow
provider (``hooks``, ``operators``, ``sensors``, ``triggers``, ``utils``, ``dag_factory``,
``exceptions``, ``get_provider_info``) builds on it. Importing this package imports neither.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raddeploy-provider")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
