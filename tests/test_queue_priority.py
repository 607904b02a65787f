"""Priority levels and rules (``[queues]``): configuration checks and rule matching."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dermpacs.config import ConfigError, load_settings
from dermpacs.intake.priority import PriorityRules, header_values

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"

RULES = """
[queues]
default_priority = "normal"

[queues.priorities]
urgent = 0
normal = 5
off-peak = 9

[[queues.rules]]
level = "urgent"
tags = { RequestedProcedurePriority = "STAT" }

[[queues.rules]]
level = "urgent"
calling_ae_title = "ER_*"
sop_class_uid = "1.2.840.10008.5.1.4.1.1.77.1.*"

[[queues.rules]]
level = "off-peak"
calling_ae_title = "RESEARCH?"

[[queues.rules]]
level = "off-peak"
tags = { BodyPartExamined = "FOOT*", ImageType = "DERIVED" }
"""


def _settings(tmp_path: Path, text: str):
    path = tmp_path / "dermpacs.toml"
    path.write_text(text)
    return load_settings(path, environ={})


@pytest.fixture
def rules(tmp_path: Path) -> PriorityRules:
    return PriorityRules.from_settings(_settings(tmp_path, RULES).queues)


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _level(rules: PriorityRules, caller: str, sop_class: str, ds: Dataset) -> str:
    return rules.level_for(
        calling_ae_title=caller,
        sop_class_uid=sop_class,
        header=header_values(ds, rules.keywords),
    )


def test_rules_read_the_keywords_they_name(rules):
    assert rules.keywords == ("RequestedProcedurePriority", "BodyPartExamined", "ImageType")


def test_no_rule_matches_gives_the_default_level(rules):
    assert _level(rules, "CAMERA", VL_PHOTO, _header(BodyPartExamined="ARM")) == "normal"


def test_a_tag_value_chooses_the_level(rules):
    ds = _header(RequestedProcedurePriority="STAT")
    assert _level(rules, "CAMERA", VL_PHOTO, ds) == "urgent"
    ds.RequestedProcedurePriority = "ROUTINE"
    assert _level(rules, "CAMERA", VL_PHOTO, ds) == "normal"


def test_every_condition_of_a_rule_must_match(rules):
    assert _level(rules, "ER_CAM2", DERMOSCOPY, _header()) == "urgent"
    assert _level(rules, "ER_CAM2", "1.2.840.10008.5.1.4.1.1.7", _header()) == "normal"
    # AE titles are matched without their padding, case-sensitively
    assert _level(rules, "ER_CAM2 ", VL_PHOTO, _header()) == "urgent"
    assert _level(rules, "er_cam2", VL_PHOTO, _header()) == "normal"


def test_first_match_wins(rules):
    # matches the STAT rule (urgent) and the RESEARCH? rule (off-peak): the first wins
    ds = _header(RequestedProcedurePriority="STAT")
    assert _level(rules, "RESEARCH1", VL_PHOTO, ds) == "urgent"
    assert _level(rules, "RESEARCH1", VL_PHOTO, _header()) == "off-peak"
    assert _level(rules, "RESEARCH12", VL_PHOTO, _header()) == "normal"  # ? is one character


def test_multi_valued_and_absent_attributes(rules):
    derived_foot = _header(BodyPartExamined="FOOT", ImageType=["ORIGINAL", "DERIVED"])
    assert _level(rules, "CAMERA", VL_PHOTO, derived_foot) == "off-peak"
    # ImageType absent: its pattern sees an empty value and does not match
    assert _level(rules, "CAMERA", VL_PHOTO, _header(BodyPartExamined="FOOT")) == "normal"


def test_levels_have_broker_priorities(tmp_path):
    queues = _settings(tmp_path, RULES).queues
    assert [queues.broker_priority(level) for level in ("urgent", "normal", "off-peak")] == [
        0,
        5,
        9,
    ]
    # a job recorded under a level this configuration lacks: the default level's priority
    assert queues.broker_priority("retired") == 5


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[queues.rules]]\nlevel = "urgnet"\n', r"queues: .*rules\[0\]\.level: 'urgnet'"),
        ('[queues]\ndefault_priority = "high"\n', r"default_priority: 'high'"),
        (
            '[[queues.rules]]\nlevel = "urgent"\ntags = { BodyPart = "ARM" }\n',
            r"queues\.rules\.0\.tags: .*'BodyPart' is not a DICOM keyword",
        ),
        (
            '[[queues.rules]]\nlevel = "urgent"\ntags = { PixelData = "*" }\n',
            r"queues\.rules\.0\.tags: .*'PixelData' is not a text",
        ),
        ('[[queues.rules]]\nlevel = "urgent"\nmodality = "XC"\n', r"queues\.rules\.0\.modality"),
        ("[queues.priorities]\nurgent = 10\n", r"queues\.priorities: .*0 to 9"),
        ('[queues.inference]\nname = "inference"\nrate_limit = "fast"\n', r"inference\.rate_limit"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named):
        _settings(tmp_path, text)


def test_rate_limits_in_celery_form(tmp_path):
    settings = _settings(
        tmp_path,
        '[queues.inference]\nname = "inference"\nrate_limit = "10/m"\n'
        '[queues.dispatch]\nname = "dispatch"\nrate_limit = "2.5"\n',
    )
    from workers.app import DISPATCH_TASK, PROCESS_TASK, celery_config

    config = celery_config(settings)
    assert config["task_annotations"][PROCESS_TASK]["rate_limit"] == "10/m"
    assert config["task_annotations"][DISPATCH_TASK]["rate_limit"] == "2.5"
    assert config["task_default_priority"] == 5


def test_redis_has_one_priority_step_per_level(tmp_path):
    settings = _settings(
        tmp_path,
        '[broker]\nurl = "redis://127.0.0.1:1/0"\n'
        "[queues.priorities]\nurgent = 1\nnormal = 4\nbulk = 4\nlater = 8\n",
    )
    from workers.app import celery_config

    options = celery_config(settings)["broker_transport_options"]
    assert options["priority_steps"] == [1, 4, 8]


def test_the_example_rules_in_the_shipped_configuration_load(tmp_path):
    """config/dermpacs.toml carries example rules, commented out: uncommented, they load."""
    text = (Path(__file__).resolve().parents[1] / "config" / "dermpacs.toml").read_text()
    lines = text.splitlines()
    first = lines.index("# [[queues.rules]]")
    example = []
    for line in lines[first:]:
        if not line.startswith("# "):
            break
        example.append(line[2:])
    settings = _settings(tmp_path, text + "\n" + "\n".join(example) + "\n")
    assert [rule.level for rule in settings.queues.rules] == ["urgent", "urgent", "off-peak"]
    assert settings.queues.rules[1].tags == {"RequestedProcedurePriority": "STAT"}


def test_a_job_store_made_before_priorities_gets_the_column(database_url):
    """An existing job table without ``priority``: opening the store adds it, and the jobs
    already there get the legacy level."""
    from sqlalchemy import inspect, text

    from dermpacs.jobs.store import JobStore, ReceivedInstance, make_engine

    store = JobStore(make_engine(database_url, pool_size=2), actor="test")
    try:
        store.create_schema()
        received = ReceivedInstance(
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            sop_instance_uid="1.2.3.4.5",
            sop_class_uid=VL_PHOTO,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae_title="CAMERA",
            spool_path="/nowhere",
            priority="urgent",
        )
        old = store.record_received(received, model_version="m").job_id
        with store.engine.begin() as connection:
            connection.execute(text("ALTER TABLE job DROP COLUMN priority"))
        assert "priority" not in {c["name"] for c in inspect(store.engine).get_columns("job")}
        store.create_schema()
        store.create_schema()  # idempotent
        assert store.get(old).job.priority == "normal"
        new = store.record_received(
            ReceivedInstance(**{**received.__dict__, "sop_instance_uid": "1.2.3.4.6"}),
            model_version="m",
        ).job_id
        assert store.priorities([old, new, 999]) == {old: "normal", new: "urgent"}
    finally:
        store.dispose()


def test_the_embedded_broker_serves_the_lowest_priority_number_first(tmp_path):
    """The embedded broker (SQLite) hands out messages by priority, then in the order sent."""
    from workers.app import configure, publish_processing

    settings = _settings(tmp_path, f'[storage]\nroot = "{tmp_path / "storage"}"\n')
    app = configure(settings)
    for job_id, level in [(1, "normal"), (2, "off-peak"), (3, "normal"), (4, "urgent")]:
        publish_processing(job_id, level=level)
    publish_processing(5)  # no such job in the store: the default level
    taken = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get("inference")) is not None:
            taken.append(message.decode()[0][0])  # Celery protocol 2 body: (args, kwargs, embed)
    assert taken == [4, 1, 3, 5, 2]
