"""The flow file schema: every key of every section, its kind, default and documentation.

One table drives three things, so they cannot drift apart: which keys the loader accepts
(anything else is an "unknown key" error with a did-you-mean hint), how it converts each
value (``kind``), and the field reference in ``docs/flows.md`` (``python -m
raddeploy_provider.flows.docs``; a test checks the committed file is current).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from raddeploy_provider.store.layout import RunDir


@dataclass(frozen=True)
class Key:
    """One key of a section: its name, its ``kind`` (which converter of :mod:`.convert` reads
    it), its documentation and example for ``docs/flows.md``. ``raddeploy``: a spelling of
    RadDeploy flow files; ``choices``: the values a ``choice`` kind allows.
    """

    name: str
    kind: str
    doc: str
    default: str = ""
    example: str = ""
    raddeploy: bool = False
    required: bool = False
    choices: tuple[str, ...] = ()


FLOW = (
    Key("name", "text", "Shown in the Airflow UI; the DAG id is made from it unless `id` is given.",
        "the file name", "HN CT OARs"),
    Key("id", "dag_id", "The DAG id and the run folder name: letters, digits, `_`, `.`, `-`.",
        "slug of `name`", "hn_ct_oars"),
    Key("version", "text", "Recorded in run notes and manifests; given to models as `RADDEPLOY_FLOW_VERSION`.",
        '""', '"1.1"'),
    Key("description", "text", "Shown as the DAG's description in the Airflow UI.", '""',
        "Head and neck organs at risk"),
    Key("priority", "priority", "0 to 4; higher runs first when workers are busy (Airflow `priority_weight`), "
        "within each kind of task: sends first, then GPU models, CPU models, sensors of new runs.",
        "0", "2"),
    Key("tags", "tags", "Extra Airflow tags, to filter DAGs in the UI.", "[]", "[hn, oar]"),
    Key("triggers", "triggers", "Which studies run the flow: a list of triggers; each maps DICOM keywords to a "
        "regex or a list of regexes that must all hold for one instance (each matches the whole value; `~` in "
        "front: must not match). Every trigger must be satisfied by some instance of the study.", required=True,
        example='[{Modality: CT, SeriesDescription: ["(?i).*(head|neck).*", "~(?i).*scout.*"]}]'),
    Key("grouping", "grouping", "When a study is complete enough to run (see the `grouping` section).",
        "see below", "{quiet_period: 10s}"),
    Key("input", "input", "How the matched instances are laid out for the first models (see `input`).",
        "see below", "{layout: flat}"),
    Key("models", "models", "The containers to run, wired by named mounts (see the `models` section).",
        required=True, example="[{image: raddeploy/threshold:latest, inputs: {src: /input}, outputs: {dst: /output}}]"),
    Key("destinations", "destinations", "DICOM nodes that receive every file of every `dst*` output "
        "(see `destinations`).", "[]", "[{connection: tps_eclipse}]"),
    Key("return_to_sender", "ports", "Also send the results back to the sender's address and AE title, on "
        "each of these ports.", "[]", "[104]"),
    Key("return_to_sender_on_ports", "ports", "RadDeploy spelling of `return_to_sender`.", "[]", "[104]",
        raddeploy=True),
    Key("return_to_sender_on_port", "ports", "RadDeploy README spelling of `return_to_sender` "
        "(one port or a list).", "[]", "104", raddeploy=True),
    Key("new_study", "choice", "`allowed`: results may be filed in a study of their own (another Study Instance "
        "UID than the input's). Otherwise every result must carry the input's Study Instance UID, or nothing is "
        "sent. `raddeploy validate` warns when allowed.", "refused", "allowed", choices=("refused", "allowed")),
    Key("new_patient", "choice", "`allowed`: results may carry another Patient ID than the input's (an "
        "anonymising export to a research archive; implies `new_study: allowed`). Otherwise a result of another "
        "patient is never sent. `raddeploy validate` warns when allowed.", "refused", "allowed",
        choices=("refused", "allowed")),
    Key("provenance", "bool", "Every result gets a Contributing Equipment item naming raddeploy-provider, "
        "the flow, its version and the model image digest, before it is sent. `off` (`false`) leaves results "
        "as the model wrote them.", "on", "off"),
    Key("review", "choice", "`required`: a person approves the results in the Airflow UI before anything is sent "
        "(an approval task between the models and every send task); rejected, nothing is sent and the run says who "
        "rejected and why.", "off", "required", choices=("required", "off")),
    Key("reviewers", "tags", "Airflow user names who may approve or reject (with `review: required`); others are "
        "refused. Default: any user who may edit the DAG's runs.", "[]", "[dr_hansen, dr_lund]"),
    Key("review_timeout", "timeout", "How long a review may wait (with `review: required`); then "
        "`on_review_timeout` decides.", "none", "4h"),
    Key("on_review_timeout", "choice", "What a review that timed out means: `reject` (nothing is sent) or "
        "`approve`.", "reject", "approve", choices=("reject", "approve")),
    Key("deadline", "timeout", "From the run being queued to its delivery: a run still not delivered then raises one "
        "alert (a notification, see `notify`).", "none", "20m"),
    Key("notify", "notify", "Who hears of this flow's runs, in place of the deployment's settings "
        "(`RADDEPLOY_NOTIFY_*`; see the `notify` section).", "the deployment's", "{on: [failure, deadline]}"),
    Key("extra", "mapping", "Free-form values that follow the flow (RadDeploy's `extra` too): given to every "
        "model as JSON in `RADDEPLOY_FLOW_EXTRA`.", "{}", "{site: aarhus}"),
    Key("tar_subdir", "keywords", "RadDeploy spelling of `input.layout` as a list of DICOM keywords.", "[]",
        "[SOPClassUID, SeriesInstanceUID]", raddeploy=True),
)

GROUPING = (
    Key("quiet_period", "duration", "Wait until no instance of the study arrived for this long.", "5s", "10s"),
    Key("timeout", "duration", "Stop waiting for missing triggers after this long.", "30m", "2h"),
    Key("on_timeout", "choice", "What a run does at the timeout: `skip` (marked skipped), `fail`, or "
        "`proceed` with the triggers that matched.", "skip", "proceed", choices=("skip", "fail", "proceed")),
)

NOTIFY = (
    Key("on", "events", "Which events notify: `failure`, `rejection` (a review said no, or timed out to reject), "
        "`deadline` (missed), `delivery` (sent).", "the deployment's (failure, rejection, deadline)",
        "[failure, rejection, deadline, delivery]", choices=("failure", "rejection", "deadline", "delivery")),
    Key("webhook", "text", "An Airflow HTTP connection id: each notification is POSTed there as JSON.",
        "the deployment's", "ops_webhook"),
    Key("email", "tags", "E-mail addresses, sent through the deployment's SMTP connection.", "the deployment's",
        "[physics@clinic.example]"),
)

INPUT = (
    Key("layout", "layout", "`flat`, or DICOM keywords whose values name nested folders in the input.",
        "flat", "[Modality, SeriesInstanceUID]"),
    Key("whole_series", "bool", "A matched instance brings every instance of its series.", "true", "false"),
    Key("transfer_syntax", "choice", "`uncompressed`: the models get decompressed Explicit VR Little Endian copies of "
        "instances received compressed (JPEG, JPEG 2000, JPEG-LS, RLE, deflated, big endian), so a model that reads "
        "DICOM without codecs works; `as_received`: the files as the sender sent them.", "as_received",
        "uncompressed", choices=("as_received", "uncompressed")),
)

MODEL = (
    Key("name", "task_id", "The task id in Airflow.", "model_<n>", "segment"),
    Key("image", "text", "The Docker image; pin it by digest (`@sha256:...`) for reproducible runs.",
        required=True, example="registry.local/hn-seg:1.1"),
    Key("command", "command", "The container command: a string (split like a shell) or a list.",
        "the image's", '["python", "/app/run.py"]'),
    Key("entrypoint", "command", "Overrides the image's entrypoint.", "the image's", '["/bin/sh", "-c"]'),
    Key("environment", "str_map", "Environment variables; the values become text.", "{}", '{THREADS: "4"}'),
    Key("inputs", "mounts", "Mount name -> path in the container, mounted read-only. `src` is the matched "
        "DICOM; any other name is another model's output. The run folder's own names are reserved: "
        + ", ".join(f"`{name}`" for name in sorted(RunDir.RESERVED - {".", ".."})) + ".",
        "{}", "{src: /input}"),
    Key("outputs", "mounts", "Mount name -> path in the container; each starts empty and must hold a file "
        "when the model ends. `dst` and every `dst*` output is sent to the destinations.", "{}",
        "{dst: /output}"),
    Key("gpu", "gpu", "GPUs the model needs: `true` means 1, a number asks for that many.", "0", "1"),
    Key("static_mounts", "static_mounts", "Read-only asset folders by name (under the static dir) -> path in "
        'the container. RadDeploy\'s `["name:/path"]` list form is accepted too.', "{}", "{hn_weights: /model}"),
    Key("config", "any", "Written as YAML to `config_path` inside the container.", "none", "{fold: all}"),
    Key("config_path", "path", "Where `config` appears in the container.", "/config/config.yaml",
        "/config/settings.yaml"),
    Key("timeout", "timeout", "The container is killed and the task fails after this long.", "none", "20m"),
    Key("retries", "count", "Airflow retries of the model task.", "0", "1"),
    Key("mem_limit", "size", "Memory limit of the container (`512m`, `24g`, or bytes).", "none", "24g"),
    Key("shm_size", "size", "Size of `/dev/shm` (`8g`, or bytes); GPU models often need more than 64m.",
        "Docker's 64m", "8g"),
    Key("network", "network", "`none` cuts the model off; `bridge` when a model must call out.", "none",
        "bridge", choices=("none", "bridge")),
    Key("user", "text", "User (and group) the container runs as.", "the image's", '"1000:1000"'),
    Key("pull", "choice", "When to pull the image: `always`, `missing` (only if not on the host), `never`.",
        "missing", "always", choices=("always", "missing", "never")),
    Key("docker_kwargs", "docker_kwargs", "RadDeploy spelling: `image`, `command`, `environment` and the "
        "container settings listed under `docker_kwargs` below.", raddeploy=True,
        example="{image: busybox, command: sh -c 'cp -r /input/* /output/'}"),
    Key("input_mounts", "mounts", "RadDeploy spelling of `inputs`.", "{}", "{src: /input}", raddeploy=True),
    Key("output_mounts", "mounts", "RadDeploy spelling of `outputs`.", "{}", "{dst: /output}", raddeploy=True),
    Key("pull_before_exec", "bool", "RadDeploy spelling: `true` means `pull: always`.", "false", "true",
        raddeploy=True),
    Key("input_dir", "path", "Old RadDeploy README spelling: models without mounts run as a chain, each "
        "reading the previous one's output here (the first reads `src`).", "/input", "/input/", raddeploy=True),
    Key("output_dir", "path", "Old RadDeploy README spelling: where a chained model writes (the last one's "
        "output is sent).", "/output", "/output/", raddeploy=True),
)

#: docker_kwargs keys RadDeploy flows may use: applied to the container as given. Every one is
#: RadDeploy's spelling (the native form has top-level keys or no such setting).
DOCKER_KWARGS = tuple(replace(key, raddeploy=True) for key in (
    Key("image", "text", "The Docker image (here or at the model's top level).", example="busybox"),
    Key("command", "command", "As `command` of the native form.", example="sh -c 'ls /input'"),
    Key("entrypoint", "command", "As `entrypoint`.", example='["/bin/sh"]'),
    Key("environment", "str_map", "As `environment`.", example="{CONTAINER_ORDER: 0}"),
    Key("mem_limit", "size", "As `mem_limit`.", example="8g"),
    Key("shm_size", "size", "As `shm_size`.", example="2g"),
    Key("user", "text", "As `user`.", example='"1000"'),
    Key("working_dir", "text", "Working directory in the container.", example="/app"),
    Key("labels", "str_map", "Container labels.", example="{team: physics}"),
    Key("network_disabled", "bool", "`false` gives the container the bridge network (the default is none).",
        example="true"),
    Key("ipc_mode", "choice", "`private` or `shareable` (never the host's).", example="shareable",
        choices=("private", "shareable")),
    Key("cpu_shares", "count", "Relative CPU weight.", example="512"),
    Key("cpu_period", "count", "CFS period (microseconds).", example="100000"),
    Key("cpu_quota", "count", "CFS quota (microseconds per period).", example="200000"),
    Key("cpu_rt_period", "count", "Realtime period (microseconds).", example="1000000"),
    Key("cpu_rt_runtime", "count", "Realtime runtime (microseconds).", example="950000"),
    Key("cpuset_cpus", "text", "CPUs the container may use.", example='"0-3"'),
    Key("nano_cpus", "count", "CPU limit in billionths of a CPU.", example="2000000000"),
    Key("mem_reservation", "size", "Soft memory limit.", example="4g"),
    Key("mem_swappiness", "count", "0-100.", example="0"),
    Key("memswap_limit", "size", "Memory plus swap limit.", example="16g"),
    Key("device_read_bps", "any", "Read rate limits: a list of {Path, Rate}.",
        example="[{Path: /dev/sda, Rate: 1048576}]"),
    Key("device_read_iops", "any", "Read IO/s limits: a list of {Path, Rate}.", example="[]"),
    Key("device_write_bps", "any", "Write rate limits: a list of {Path, Rate}.", example="[]"),
    Key("device_write_iops", "any", "Write IO/s limits: a list of {Path, Rate}.", example="[]"),
))

#: docker_kwargs that would weaken the isolation of the host, with what to do instead.
DOCKER_KWARGS_REFUSED = {
    "privileged": "models run unprivileged; ask for GPUs with `gpu:`",
    "cap_add": "models run with no added capabilities",
    "devices": "ask for GPUs with `gpu:`; other devices are not given to models",
    "device_requests": "ask for GPUs with `gpu:`",
    "device_cgroup_rules": "ask for GPUs with `gpu:`; other devices are not given to models",
    "volumes": "use `inputs`, `outputs` and `static_mounts`",
    "mounts": "use `inputs`, `outputs` and `static_mounts`",
    "network_mode": "use `network: bridge` (or `network_disabled: false`) when a model must call out",
    "ports": "models do not listen; they read their inputs and write their outputs",
    "pid_mode": "models do not see the host's processes",
    "security_opt": "models run with the default security profile",
    "userns_mode": "models run in the default user namespace",
    "runtime": "the runtime is the host's setting (see the GPU settings in README)",
    "sysctls": "kernel settings are the host's",
    "cgroup_parent": "resource groups are the host's",
    "extra_hosts": "models have no network by default",
    "dns": "models have no network by default",
}

DESTINATION = (
    Key("connection", "text", "An Airflow connection of type `dicom` (host, port, AE titles, set in the UI).",
        example="tps_eclipse"),
    Key("host", "text", "Host name or address of the node.", example="10.0.0.5"),
    Key("port", "port", "Its DICOM port.", example="104"),
    Key("ae_title", "ae_title", "Its AE title (the called AE).", example="ARIA"),
    Key("calling_ae_title", "ae_title", "Our AE title towards it.", "RADDEPLOY", "RADDEPLOY"),
)

SECTIONS: dict[str, tuple[Key, ...]] = {
    "flow": FLOW,
    "grouping": GROUPING,
    "input": INPUT,
    "notify": NOTIFY,
    "models[]": MODEL,
    "docker_kwargs": DOCKER_KWARGS,
    "destinations[]": DESTINATION,
}


def keys_of(section: str) -> dict[str, Key]:
    return {key.name: key for key in SECTIONS[section]}
