"""Thread share per process (hf_flag.threads): cores split among the processes on a machine, capped by idle cores."""
from hf_flag.threads import thread_share


def test_share_of_cores_among_local_processes():
    assert thread_share({}, cores=16, load=0.0) == 16
    assert thread_share({"LOCAL_WORLD_SIZE": "4"}, cores=16, load=0.0) == 4
    assert thread_share({"LOCAL_WORLD_SIZE": "3"}, cores=16, load=0.0) == 5
    assert thread_share({"WORLD_SIZE": "8"}, cores=2, load=0.0) == 1  # never 0
    assert thread_share({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "16"}, cores=16, load=0.0) == 8  # local count first


def test_busy_machine_and_explicit_setting():
    assert thread_share({}, cores=2, load=9.8) == 1  # a loaded 2-core machine: one thread
    assert thread_share({}, cores=16, load=6.2) == 10
    assert thread_share({"OMP_NUM_THREADS": "3"}, cores=16, load=15.0) == 3  # the user's explicit choice wins
    assert thread_share({"OMP_NUM_THREADS": "junk", "LOCAL_WORLD_SIZE": "2"}, cores=8, load=0.0) == 4
