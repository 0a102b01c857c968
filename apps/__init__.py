"""The apps layer: the commands that drive both tiers (CLI, demo, load driver, token counting, the
flywheel benchmark). The only code that imports the trainer (`aurora_jax`) and the serving tier
(`serving`) together; neither tier, nor `bridge` or `bench`, imports it."""
