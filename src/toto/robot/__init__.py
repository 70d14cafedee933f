"""Robot manipulation from frozen Toto features (arXiv 2501.05453, Sec. 4.6 "robotics"):
Meta-World tasks in MuJoCo, scripted-expert and LeRobot demonstrations, behaviour cloning and PPO
on a frozen Toto, success-rate evaluation. The simulator and RL library are the optional
``robot`` extra, imported lazily by these modules."""
