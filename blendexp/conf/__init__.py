"""Packaged Hydra configs (pkg://blendexp.conf): a package, so installed console scripts find them."""
