"""headtrain: everything after the store: training, evaluation, prediction and export."""
