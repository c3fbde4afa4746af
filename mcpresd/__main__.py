from mcpresd.cli import main

raise SystemExit(main())
