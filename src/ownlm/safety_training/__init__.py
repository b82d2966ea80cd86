"""The `safety` stage: training the level-2 safety classifier (`ownlm.safety` serves it)."""
