"""Publishing dumps into a libvirt checkout: build, regenerate and verify its tests, commit, send."""
