"""The shared utility layer: chores every package needs, each written once.

- `files`: folders and files written atomically (temp, then rename), stale temporaries, sha256 digests;
- `imports`: `package.module:object` specs imported with one clear error;
- `config`: YAML mappings read into dataclasses, types checked, unknown fields refused, `--a.b VALUE`
  command-line overrides.

Nothing here imports another warpkit package: this is the bottom layer.
"""
