"""many-vmas refuses what the guest cannot hold before it starts (fast, no VM;
the state itself is proven on real guests in tests/experiments/test_cost.py)."""

import pytest

from ksmlens.cli import main
from ksmlens.errors import KsmlensError
from ksmlens.lab.manyvmas import MANY_VMAS, parse_args, vmas_per_process


class _Guest:
    def __init__(self, limit):
        self.limit = limit

    def read_file(self, path):
        assert path == "/proc/sys/vm/max_map_count"
        return f"{self.limit}\n"


def test_vmas_above_max_map_count_is_one_line():
    with pytest.raises(KsmlensError, match=r"needs 70064 VMAs in one process, above the "
                       r"guest's vm.max_map_count \(65530\)") as e:
        MANY_VMAS.precheck(_Guest(65530), (*MANY_VMAS.args, "--vmas", "70000"))
    assert "sysctl -w vm.max_map_count=70064" in e.value.hint
    # the fork shape spreads them over C + 1 processes: 70,000 fit
    MANY_VMAS.precheck(_Guest(65530), (*MANY_VMAS.args, "--vmas", "70000", "--shape", "fork"))


def test_the_last_option_wins_as_in_the_program():
    o = parse_args((*MANY_VMAS.args, "--vmas", "2000", "--shape", "fork", "--forks", "4"))
    assert (o["vmas"], o["shape"], o["forks"]) == (2000, "fork", 4)
    assert vmas_per_process(o) == 400


def test_its_options_belong_to_it(capsys):
    assert main(["scenario", "run", "mremap", "--vmas", "10"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ksmlens: error: --vmas: options of the many-vmas scenario, not of mremap: leave "
        "them out, or run many-vmas"]
