"""One module per `landcover` subcommand: `stage(Params, Reporter) -> StageResult`,
reading files and writing files."""
