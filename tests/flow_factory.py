"""Write many realistic flow files, for scale tests and the flows benchmark."""

from __future__ import annotations

from pathlib import Path

SITES = ["HeadNeck", "Breast", "Prostate", "Lung", "Brain", "Pelvis", "Abdomen", "Spine"]


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
