"""Flow files for the tests: ``write`` one, build an ensemble's YAML, write many for scale tests and the flows benchmark."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

SITES = ["HeadNeck", "Breast", "Prostate", "Lung", "Brain", "Pelvis", "Abdomen", "Spine"]


def write(folder: Path, text: str, name: str = "flow.yaml") -> Path:
    """``folder/name`` (folders made as needed) holding ``text`` dedented, its leading blank lines dropped.

    Line 1 of the file is the first line with text on it, so error line numbers can be asserted.
    """
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def _after_key(value: object, indent: int) -> str:
    """What follows ``key:`` for a key at column ``indent``: a scalar, a block list, or text with newlines as ``|``."""
    pad = " " * indent
    if isinstance(value, list):
        return "".join(f"\n{pad}  - " + (_literal(item, indent + 4) if isinstance(item, str) and "\n" in item
                                         else json.dumps(item) if isinstance(item, str) else str(item))
                       for item in value)
    if isinstance(value, str) and "\n" in value:
        return " " + _literal(value, indent + 2)
    return f" {value}"


def _literal(text: str, indent: int) -> str:
    return "|\n" + textwrap.indent(text, " " * indent).rstrip("\n")


def model_yaml(*, image: str, inputs: dict[str, str], outputs: dict[str, str], name: str | None = None,
               command: str | list[str] | None = None, native: bool = False, **keys: object) -> str:
    """One entry of a flow's ``models:`` list, after a blank line, its mappings in block style.

    In RadDeploy's spelling (``docker_kwargs``, ``input_mounts``, ``output_mounts``) or, with ``native``,
    in ours (``image``, ``inputs``, ``outputs``); ``keys`` (``timeout=...``) follow, in their order.
    """
    lines = [] if name is None else [f"name: {name}"]
    container = [f"image: {image}"]
    if command is not None:
        container.append("command:" + _after_key(command, 4 if native else 6))
    lines += container if native else ["docker_kwargs:", *(f"  {line}" for line in container)]
    inputs_key, outputs_key = ("inputs", "outputs") if native else ("input_mounts", "output_mounts")
    for key, mounts in ((inputs_key, inputs), (outputs_key, outputs)):
        lines += [f"{key}:", *(f"  {folder}: {path}" for folder, path in mounts.items())]
    lines += [f"{key}:" + _after_key(value, 4) for key, value in keys.items()]
    return "\n  - " + "\n    ".join(lines) + "\n"


#: The merge model of :func:`ensemble_flow` unless told otherwise: model_yaml's keys but image and mounts.
MERGE = {"command": "sh -c 'cp /input*/* /output/'", "pull_before_exec": True, "timeout": 1800}


def ensemble_flow(*, name: str = "Five fold ensemble", head: str = "triggers:\n  - Modality: CT\n", folds: int = 5,
                  image: str = "busybox:1.36", fold: Callable[[int], dict] | None = None,
                  merge: dict | None = None, merge_mount: str = "/input{i}",
                  host: str = "localhost", port: int = 10001, ae_title: str = "STORESCP") -> str:
    """A fan-out/fan-in flow (RadDeploy's five-fold ensemble): ``folds`` models in parallel, then a merge.

    Fold ``i`` reads ``src`` at ``/input`` and writes ``seg{i}`` at ``/output``; the merge reads every
    ``seg{i}`` (at ``merge_mount``) and writes ``dst``, sent to ``ae_title`` at ``host:port``.
    ``head`` is the YAML between the name and ``models:`` (triggers, and id, grouping...).
    How each model is written is :func:`model_yaml`'s keywords: ``fold(i)`` for fold ``i`` (by default an
    unnamed RadDeploy model touching ``/output/SEG_{i}``), ``merge`` for the merge (by default ``MERGE``).
    The text starts with a newline, as written in the tests; :func:`write` drops it.
    """
    fold = fold or (lambda i: {"command": f"sh -c 'touch /output/SEG_{i}'"})
    models = [model_yaml(image=image, inputs={"src": "/input"}, outputs={f"seg{i}": "/output"}, **fold(i))
              for i in range(folds)]
    models.append(model_yaml(image=image, inputs={f"seg{i}": merge_mount.format(i=i) for i in range(folds)},
                             outputs={"dst": "/output"}, **(MERGE if merge is None else merge)))
    return (f"\nname: {name}\n{head}models:\n" + "".join(models)
            + f"destinations:\n  - host: {host}\n    port: {port}\n    ae_title: {ae_title}\n")


def write_flows(folder: Path, count: int) -> list[Path]:
    """``count`` flows, each with two triggers and a two-model chain, half in RadDeploy spelling."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        site = SITES[i % len(SITES)]
        if i % 2:
            text = f"""
name: "{site} auto-segmentation {i}"
version: "1.{i}"
priority: {i % 5}
triggers:
  - Modality: ["CT"]
    SeriesDescription: ["(?i){site}", "~(?i)scout|topogram"]
    ImageType: ["ORIGINAL"]
  - Modality: ["MR"]
    SeriesDescription: ["(?i)t1.*{i}$"]
models:
  - docker_kwargs:
      image: "registry.local/{site.lower()}-prep:1.{i}"
      command: sh -c 'cp -r /input/* /output/'
    input_mounts: {{src: /input}}
    output_mounts: {{prep: /output}}
  - docker_kwargs:
      image: "registry.local/{site.lower()}-seg:2.{i}"
    gpu: true
    input_mounts: {{prep: /input}}
    output_mounts: {{dst: /output}}
    timeout: 1800
destinations:
  - {{host: 10.0.0.5, port: 104, ae_title: ARIA}}
"""
        else:
            text = f"""
name: {site} synthetic CT {i}
id: {site.lower()}_sct_{i}
version: "2.{i}"
tags: [{site.lower()}]
triggers:
  - Modality: MR
    SeriesDescription: ["(?i){site}", "(?i)t1|t2"]
  - Modality: CT
    StudyDescription: "(?i)rt.*{i}"
grouping: {{quiet_period: 10s, timeout: 30m, on_timeout: proceed}}
models:
  - name: convert
    image: registry.local/sct:{i}.0
    inputs: {{src: /input}}
    outputs: {{mr: /output}}
  - name: sct
    image: registry.local/sct-model:{i}.0
    gpu: 1
    inputs: {{mr: /input}}
    outputs: {{dst: /output}}
destinations:
  - connection: tps_eclipse
"""
        path = folder / f"flow_{i:03d}.yaml"
        path.write_text(text)
        paths.append(path)
    return paths


#: A planning CT instance's header as the index stores it (keyword -> text or list).
CT_HEADER = {
    "Modality": "CT", "SeriesDescription": "HeadNeck 2.5mm", "StudyDescription": "RT planning",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    "BodyPartExamined": "HEADNECK", "Manufacturer": "Siemens", "SliceThickness": "2.5",
}
