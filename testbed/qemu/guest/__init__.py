"""What runs inside a guest with Debian's python3: the guest agent (``agent``, installed as
/opt/testbed/guest_agent.py) and its role extensions (``tp_extension``,
``cryptovm_extension``, beside it), see images/guest.yaml. They import ``attestation``,
``trusted_passages`` and ``cryptovm``, never ``testbed``.
"""
