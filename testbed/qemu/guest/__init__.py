"""What runs inside a guest with Debian's python3: the guest agent (``agent``) and its role
extensions (``tp``, ``cryptovm``). Copied into the image under other names (see
images/guest.yaml); they import ``attestation``, ``trusted_passages`` and ``cryptovm``,
never ``testbed``.
"""
