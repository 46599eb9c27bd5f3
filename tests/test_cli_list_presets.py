"""`python -m rsm_fast.train --list-presets` piped into a reader that stops early (`| head`)."""
import subprocess
import sys

from rsm_fast.config import preset_names


def test_list_presets_into_a_closed_pipe_ends_quietly():
    p = subprocess.Popen([sys.executable, "-m", "rsm_fast.train", "--list-presets"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = p.stdout.readline().decode()
    p.stdout.close()                        # the reader leaves after one line, as `head -1` does
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert first.split()[0] == preset_names()[0]


def test_list_presets_prints_every_preset_with_its_description():
    out = subprocess.run([sys.executable, "-m", "rsm_fast.train", "--list-presets"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert [line.split()[0] for line in out] == preset_names()
    assert all(len(line.split(None, 1)) == 2 for line in out)
