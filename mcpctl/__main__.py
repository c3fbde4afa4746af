from mcpctl.main import main

raise SystemExit(main(exit_at_once=True))
