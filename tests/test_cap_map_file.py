"""epn-cap-map-file end to end: the running service maps a number added to the file at its next cycle, no restart."""

import signal
import subprocess

from tests.test_mxsync import ENDED, MXSYNC, _wait_for, recorded


def test_service_maps_a_number_added_to_the_map_file_at_its_next_cycle(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "20001a", equipment_id=23, **ENDED)
    map_file = facility.workdir / "epn_cap_map.yml"
    map_file.write_text('# EPN number -> project folder\n"12282": ny79\n')  # the same entry as config.yml: allowed
    # A cycle every 3.6 s: the service re-reads config.yml (and so the map file) before each one.
    config = facility.write_config(epn_cap_map_file=str(map_file), sync_frequency_hours=0.001)
    log_file = facility.workdir / "log" / "sync.log"
    process = subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_for(lambda: log_file.exists() and "Cycle finished" in log_file.read_text(), process)
        assert recorded(config) == {"12282a"}
        assert "20001a: its number is not in epn_cap_map" in log_file.read_text()

        # A line mapping a number elsewhere than config.yml does is refused, naming both; the service goes on.
        with open(map_file, "a", encoding="utf-8") as stream:
            stream.write('"12282": zz99\n')
        _wait_for(lambda: "keep one of the two" in log_file.read_text(), process)
        log = log_file.read_text()
        assert f"epn-cap-map-file: {map_file}: 12282: maps it to 'zz99', but config.yml epn_cap_map.12282" in log

        map_file.write_text('# EPN number -> project folder\n"12282": ny79\n"20001": ab12\n')
        _wait_for(lambda: "20001a" in recorded(config), process)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in err
    assert recorded(config) == {"12282a", "20001a"}
    assert (facility.destination / "ab12" / "20001a" / "data").is_dir()
    assert "mxsync started" in log_file.read_text() and log_file.read_text().count("mxsync started") == 1
