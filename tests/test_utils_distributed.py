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


def test_library_modules_register_the_cleanup_through_the_mixin():
    """One place: each LightningModule of the library that runs under DDP gets the handler from
    ``ProcessGroupCleanup.setup`` (tests/test_ko.py's ddp_spawn test checks it registers in every rank)."""
    import lightning as L

    from lightning_eff.distill import DistillationModule
    from lightning_eff.explain import AutoGnothi
    from lightning_eff.llm import CausalLMModule
    from lightning_eff.models import ImageClassifier
    from lightning_eff.rl import Think2Drive
    from lightning_eff.tokens.vlm import TinyVLM
    from lightning_eff.utils import distributed as d

    for cls in (AutoGnothi, CausalLMModule, Think2Drive, TinyVLM, ImageClassifier, DistillationModule):
        mro = cls.__mro__
        assert d.ProcessGroupCleanup in mro and mro.index(d.ProcessGroupCleanup) < mro.index(L.LightningModule)

    calls = []

    class M(d.ProcessGroupCleanup, L.LightningModule):
        def setup(self, stage):
            super().setup(stage)
            calls.append(stage)

    registered = d._REGISTERED
    try:
        d._REGISTERED = False
        M().setup("fit")  # no process group: nothing to register, but the module's own setup ran
        assert calls == ["fit"] and not d._REGISTERED
    finally:
        d._REGISTERED = registered
