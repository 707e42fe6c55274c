from unbottle.cli import console

console()
