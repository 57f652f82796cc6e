"""Click commands, one module per area; engram_local.cli assembles them into the group."""
