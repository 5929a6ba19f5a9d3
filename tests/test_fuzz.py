"""Promise 4 by property-based testing: mutated configs and state files give a clean error, never a traceback,
never a changed state file. The real command lines run in-process (tests/fuzzing.py says how it is sandboxed).

CI runs a modest number of examples; `bench/faults.py --examples N` runs many more.
"""

import os
import shutil
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from tests import fuzzing
from tests.facility import Facility
from tests.facility.sshd import SSHD

EXAMPLES = int(os.environ.get("MXSYNC_FUZZ_EXAMPLES", 60))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

with tempfile.TemporaryDirectory(prefix="mxsync-fuzz-") as _directory:
    BASE = fuzzing.make_sandbox(_directory)
BASE_TEXT = yaml.safe_dump(BASE, sort_keys=False)


@FUZZ
@given(fuzzing.mutated_config(BASE, sandboxed=False))
def test_check_on_mutated_config_is_clean(config):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.check_config(sandbox, yaml.safe_dump(config, allow_unicode=True)) == []


@FUZZ
@given(fuzzing.mutated_text(BASE_TEXT))
def test_check_on_mangled_config_text_is_clean(text):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.check_config(sandbox, text) == []


@FUZZ
@given(fuzzing.random_yaml())
def test_check_on_random_yaml_is_clean(text):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.check_config(sandbox, text) == []


@FUZZ
@given(fuzzing.mutated_config(BASE, sandboxed=True))
def test_run_on_mutated_config_is_clean_and_touches_no_state(config):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.run_config(sandbox, config) == []


@FUZZ
@given(fuzzing.ignore_texts())
def test_run_on_mutated_ignore_file_is_clean_and_never_rewrites_it(text):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.run_state(sandbox, ignore_text=text) == []


@FUZZ
@given(fuzzing.history_texts())
def test_run_on_a_mutated_old_history_imports_it_or_leaves_it_with_a_warning(text):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.run_state(sandbox, history_text=text) == []


@FUZZ
@given(fuzzing.store_damages())
def test_run_on_a_damaged_store_moves_it_aside_or_leaves_it_and_never_crashes(how):
    with fuzzing.sandbox() as sandbox:
        assert fuzzing.run_store(sandbox, how) == []


@pytest.fixture(scope="module")
def alert_config(tmp_path_factory):
    """One facility for the epnalert examples: an unknown EPN on SFTP and the portal, so every run has an alert."""
    if shutil.which("ssh") is None or not SSHD.exists():
        pytest.skip("the simulated facility needs OpenSSH")
    with Facility(tmp_path_factory.mktemp("alert-fuzz")) as facility:
        facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
        yield facility.write_config()


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3), suppress_health_check=list(HealthCheck))
@given(text=fuzzing.epnalert_state_texts())
def test_epnalert_on_mutated_state_still_alerts_cleanly(alert_config, text):
    assert fuzzing.run_epnalert_state(alert_config, text) == []
