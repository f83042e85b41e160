"""The runtime policy of a qemu node, predicted from its guest image's recipe.

What a VM's PCR 10 holds once its guest agent serves (testbed/qemu/guest/agent.py): the
guest kernel's ``boot_aggregate`` (allowed by name), then the agent's own files, the guest
agent and the role extensions the image ships beside it (the recipe's ``project`` files
from ``testbed/qemu/guest/``). Their digests are those of the repository files the image
is built from: the image's digest covers them, so another file means another image.
Everything else a guest runs is in its initrd, which the firmware measures into PCR 9.
"""

from __future__ import annotations

from attestation.files import hash_file
from attestation.ima import RuntimePolicy
from testbed.spec.recipe import ImageRecipe, project_files

__all__ = ["GUEST_SOURCES", "predicted_runtime_name", "vm_runtime_policy"]

GUEST_SOURCES = "testbed/qemu/guest/"
MAX_GUEST_FILE = 1 << 20  # the guest agent measures at most this much of a file


def predicted_runtime_name(node: str) -> str:
    """The name a predicted runtime policy carries: ``up`` re-predicts a file so named."""
    return f"{node}-predicted-runtime"


def vm_runtime_policy(node: str, recipe: ImageRecipe) -> RuntimePolicy:
    """Allow exactly the guest agent's files, as the image installs them."""
    allow = {}
    for source, dest in recipe.project:
        if source.startswith(GUEST_SOURCES) and source.endswith(".py"):
            for path in project_files(source):
                digest, _ = hash_file(path, MAX_GUEST_FILE, what="guest agent file")
                allow["/" + dest] = frozenset({digest})
    return RuntimePolicy(predicted_runtime_name(node), allow)
