from cm3dmm.cli import entry

entry()
