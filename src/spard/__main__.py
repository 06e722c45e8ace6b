from spard.cli import main

raise SystemExit(main())
