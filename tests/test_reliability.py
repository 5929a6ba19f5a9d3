"""The reliability and security matrix: each fault injected for real against the simulated facility.

The six promises (tests/faults.py lists them) are checked after every fault by a Tally: EPNs
recorded with files missing or short, ignore.yml entries lost, tracebacks, secrets in any log,
email, state file or output, and whatever else the scenario expects (tests/scenarios.py). A test
passes only with a clean Tally. The same scenarios run many times from bench/faults.py.

The kill -9 loop runs MXSYNC_FAULT_RUNS times (default 5; seed MXSYNC_FAULT_SEED). Tests that mount
a small tmpfs (disk full, read-only) need root and skip otherwise.
"""

import os
import random

import pytest

from tests import scenarios
from tests.faults import IS_ROOT, ROOT_REASON, Tally, fault_runs, kill_leftovers

needs_root = pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
SEED = int(os.environ.get("MXSYNC_FAULT_SEED", 1))


def run(scenario, facility, **options):
    """Run one scenario on the facility and fail with every breach it counted."""
    tally = Tally(scenario.__name__)
    try:
        scenario(facility, tally, random.Random(SEED), **options)
    finally:
        kill_leftovers()
    assert tally.runs >= 1
    assert tally.clean, tally.report()
    return tally


# ---------------------------------------------------------------- promises 1 and 2: crashes


def test_kill9_at_random_moments_loses_no_entry_and_records_nothing_incomplete(facility):
    # Staff's own entries, EPNs recorded before each kill, and the copies they stand for all survive.
    tally = run(scenarios.kill9_loop, facility, runs=fault_runs(5))
    assert tally.runs == fault_runs(5)


def test_kill9_during_live_and_final_passes_leaves_a_sound_store(facility):
    tally = run(scenarios.kill9_store_loop, facility, runs=fault_runs(5))
    assert tally.runs == fault_runs(5)


def test_a_source_file_growing_during_its_transfer_is_not_recorded_short(facility):
    run(scenarios.source_grows_mid_transfer, facility)


def test_scripted_edits_under_the_lock_during_a_pass_lose_nothing(facility):
    run(scenarios.scripted_hand_edits, facility)


# ---------------------------------------------------------------- promises 1 and 3: interruptions


def test_sigterm_to_the_service_mid_transfer_exits_0_and_records_nothing_unfinished(facility):
    run(scenarios.sigterm_mid_transfer, facility)


def test_connection_cut_mid_transfer_is_retried_and_resumed(facility):
    run(scenarios.connection_cut, facility)


def test_sshd_stopped_mid_transfer_fails_the_epn_and_the_next_pass_completes(facility):
    run(scenarios.sshd_stopped, facility)


def test_login_refused_starts_no_transfer_alerts_and_check_names_it(facility):
    run(scenarios.login_refused, facility)


def test_host_key_changed_is_refused_by_ssh_and_sftp(facility):
    run(scenarios.host_key_changed, facility)


@needs_root
def test_disk_full_at_the_destination_records_nothing_incomplete(facility):
    run(scenarios.disk_full, facility)


@needs_root
def test_read_only_destination_starts_nothing_and_a_read_only_project_fails_only_its_epn(facility):
    run(scenarios.destination_read_only, facility)


@needs_root
def test_full_state_file_system_loses_nothing_and_crashes_nothing(facility):
    run(scenarios.state_disk_full, facility)


def test_smtp_refusing_the_alert_is_logged_and_the_alert_follows_later(facility):
    run(scenarios.smtp_refusing, facility)


# ---------------------------------------------------------------- promise 3: the service keeps going


def test_service_loop_survives_a_fault_per_cycle_then_stops_on_sigterm(facility):
    run(scenarios.service_under_faults, facility)


# ---------------------------------------------------------------- promise 4: bad portal answers


@pytest.mark.parametrize("kind", sorted(scenarios.PORTAL_FAULTS))
def test_portal_fault_gives_one_clear_line_and_transfers_nothing(facility, kind):
    run(scenarios.portal_fault(kind), facility)


@pytest.mark.parametrize("kind", sorted(scenarios.PORTAL_ANSWERS))
def test_malformed_portal_answer_gives_one_clear_line(facility, kind):
    run(scenarios.portal_answer(kind), facility)


def test_visits_with_missing_or_wrongly_typed_fields_are_reported_and_good_ones_sync(facility):
    run(scenarios.malformed_visits, facility)


def test_times_without_or_with_odd_offsets_are_planned_by_their_instant(facility):
    run(scenarios.odd_times, facility)


def test_a_huge_but_legal_portal_answer_is_planned(facility):
    run(scenarios.huge_answer, facility)


# ---------------------------------------------------------------- promise 5: hostile names


def test_hostile_epn_names_from_the_portal_reach_no_path_and_no_argv(facility):
    run(scenarios.hostile_portal_names, facility)


def test_hostile_file_names_and_symlinks_at_the_facility_stay_inside_the_destination(facility):
    run(scenarios.hostile_file_names, facility)


def test_hostile_project_folders_in_the_config_are_refused_before_anything_runs(facility):
    tally = run(scenarios.hostile_projects, facility)
    assert tally.runs == len(scenarios.HOSTILE_PROJECTS)


# ---------------------------------------------------------------- epnalert: its console entry point, in-process


def test_epnalert_reports_hostile_sftp_folders_escaped_and_writes_nothing_else(facility):
    run(scenarios.epnalert_hostile_folders, facility)


def test_epnalert_survives_a_folder_name_that_is_not_utf8(facility):
    run(scenarios.epnalert_undecodable_folder, facility)


@pytest.mark.parametrize("kind", sorted(scenarios.EPNALERT_PORTAL_FAULTS))
def test_epnalert_alerts_from_sftp_when_the_portal_fails(facility, kind):
    run(scenarios.epnalert_portal_fault(kind), facility)


def test_epnalert_smtp_login_refused_is_one_line_and_no_password_leaks(facility):
    run(scenarios.epnalert_smtp_login_refused, facility)
