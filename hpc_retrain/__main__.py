from hpc_retrain.commands import entry

entry()
