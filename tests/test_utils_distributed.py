"""The gloo exit handler: registered once, destroys the group at exit, survives a vanished peer."""

import subprocess
import sys
import textwrap


def test_exit_handler_destroys_the_group_and_is_idempotent(tmp_path):
    script = textwrap.dedent(
        """
        import atexit, os, sys
        import torch.distributed as dist
        from lightning_eff.utils import distributed as d

        d.destroy_process_group_at_exit()  # no group yet: nothing registered
        assert not d._REGISTERED
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
        d.destroy_process_group_at_exit()
        d.destroy_process_group_at_exit()
        assert d._REGISTERED
        d._destroy()
        assert not dist.is_initialized()
        d._destroy()  # a second call (the atexit one) is a no-op
        print("ok")
        """
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-c", script, str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
