from mcpctl.main import main

raise SystemExit(main())
