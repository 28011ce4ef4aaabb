"""The dataset card templates; a package so that installs, editable ones too, map it."""
