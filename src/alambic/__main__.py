from alambic.cli import main

raise SystemExit(main())
