"""stepimage: an inference server for the Step Image Edit 2 image API."""
