from airflow_antbatch.cli import main

raise SystemExit(main())
