from unbottle.cli import main

main()
