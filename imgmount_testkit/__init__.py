"""imgmount's test kit: what the tests, ``scripts/demo`` and the benchmarks share, outside ``tests/``.

- :mod:`.images`: disk images built from specs at run time (sfdisk scripts, mkfs, the LVM tools,
  ``qemu-img``); :mod:`.lvm_synth` writes LVM physical volumes byte for byte; :mod:`.sample` is the
  README's sample image.
- :mod:`.bus`: a private system-like bus with the real policy; :mod:`.daemon` the real ``imgmountd`` on it;
  :mod:`.client` clients in the test's process; :mod:`.users` callers of other uids (:mod:`.busclient` is
  their client process) and the group ``imgmount``; :mod:`.polkit` a real polkitd; :mod:`.with_daemon` runs
  a command with the daemon serving (``scripts/demo``).

Nothing here is installed: it runs from the checkout, as root, and the lint lane checks it like ``mountd``.
"""
