"""Flow files: the typed model, loading both spellings, validation and trigger matching.

No Airflow import here: the listener and the CLI use this package without Airflow.
"""

from raddeploy_provider.units import parse_duration

from .errors import FlowError, FlowWarning
from .loader import LoadResult, load_flow, load_flows
from .matching import explain, matched_triggers, trigger_matches, unmet_triggers
from .model import SOURCE_MOUNT, Destination, Flow, ModelSpec, Trigger

__all__ = [
    "FlowError", "FlowWarning", "LoadResult", "load_flow", "load_flows", "parse_duration",
    "explain", "matched_triggers", "trigger_matches", "unmet_triggers",
    "SOURCE_MOUNT", "Destination", "Flow", "ModelSpec", "Trigger",
]
